"""Simulated production traffic: three services talking to a big production model.

- `customer-service`: a tool router with six tools and realistic argument values;
- `generic-assistant`: plain question answering;
- `policy-governance`: an assistant answering governance questions.

Like real traffic it has exact duplicates (retries), PII in user messages (which the
ingest scrubber must catch) and a few non-compliant answers (which curation must drop).
Deterministic for a given seed.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

PRODUCTION_MODEL = "meta/llama-3.1-70b-instruct"

def _tool(name: str, description: str, *params: str) -> dict[str, Any]:
    """An OpenAI function tool: parameters as JSON Schema, every argument a required string."""
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in params},
                           "required": list(params)}}


TOOLS: list[dict[str, Any]] = [
    _tool("get_order_status", "Look up the status of an order", "order_id"),
    _tool("track_shipment", "Track a parcel with the carrier", "tracking_number", "carrier"),
    _tool("initiate_return", "Start a return for an order", "order_id", "reason"),
    _tool("update_shipping_address", "Change the delivery address of an open order",
          "order_id", "street", "city", "zip_code"),
    _tool("check_product_availability", "Check stock of a product near a ZIP code", "product_id", "zip_code"),
    _tool("escalate_to_human", "Hand the conversation to a human agent", "reason", "priority"),
]

CITIES = [("Springfield", "62704"), ("Portland", "97205"), ("Austin", "78701"), ("Denver", "80202"),
          ("Madison", "53703"), ("Raleigh", "27601"), ("Boise", "83702"), ("Tucson", "85701")]
STREETS = ["12 Oak St", "480 Pine Ave", "77 Elm Rd", "1500 Lake Blvd", "9 Cedar Ct", "230 Maple Dr"]
CARRIERS = ["UPS", "FedEx", "USPS", "DHL"]
RETURN_REASONS = ["damaged on arrival", "wrong size", "changed my mind", "arrived too late", "defective"]
PRODUCTS = ["SKU-1042", "SKU-2231", "SKU-3307", "SKU-4410", "SKU-5126", "SKU-6093"]
PII = ["my email is jane.doe@example.com", "call me at (415) 555-0132", "my SSN is 123-45-6789",
       "card 4111 1111 1111 1111", "reach me at +44 20 7946 0958", "from IP 203.0.113.42"]


def _order(rng: random.Random) -> str:
    return f"ORD-{rng.randint(10000, 99999)}"


def _tracking(rng: random.Random) -> str:
    return "1Z" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(16))


def _tool_call(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """A user utterance and the tool call the production model answered with."""
    kind = rng.randrange(6)
    order = _order(rng)
    if kind == 0:
        text = rng.choice(["Where is my order {o}?", "Can you check the status of {o}?",
                           "Has order {o} shipped yet?", "What's happening with {o}"]).format(o=order)
        return text, "get_order_status", {"order_id": order}
    if kind == 1:
        num, carrier = _tracking(rng), rng.choice(CARRIERS)
        text = rng.choice(["Track my {c} package {t}", "Where is parcel {t}? It's with {c}.",
                           "Can you trace {c} shipment {t} for me"]).format(c=carrier, t=num)
        return text, "track_shipment", {"tracking_number": num, "carrier": carrier}
    if kind == 2:
        reason = rng.choice(RETURN_REASONS)
        text = rng.choice(["I want to return {o}, it was {r}", "Please start a return for {o}: {r}",
                           "Return order {o} because it was {r}"]).format(o=order, r=reason)
        return text, "initiate_return", {"order_id": order, "reason": reason}
    if kind == 3:
        (city, zip_code), street = rng.choice(CITIES), rng.choice(STREETS)
        text = rng.choice(["Ship {o} to {s}, {c} {z} instead", "Change the address on {o} to {s}, {c} {z}",
                           "I moved - please send {o} to {s}, {c}, {z}"]).format(o=order, s=street, c=city, z=zip_code)
        return text, "update_shipping_address", {"order_id": order, "street": street, "city": city,
                                                 "zip_code": zip_code}
    if kind == 4:
        product, (_, zip_code) = rng.choice(PRODUCTS), rng.choice(CITIES)
        text = rng.choice(["Is {p} in stock near {z}?", "Can I buy {p} in a store around {z}",
                           "Do you have {p} available at {z}?"]).format(p=product, z=zip_code)
        return text, "check_product_availability", {"product_id": product, "zip_code": zip_code}
    priority = rng.choice(["high", "normal"])
    reason = rng.choice(["billing dispute", "repeated failed deliveries", "complaint about an agent",
                         "account locked"])
    text = rng.choice(["I need a human, this is about a {r}", "Let me talk to a person: {r}",
                       "Escalate please, {r}"]).format(r=reason)
    return text, "escalate_to_human", {"reason": reason, "priority": priority}


def _customer_service(rng: random.Random, i: int) -> dict[str, Any]:
    text, name, args = _tool_call(rng)
    tools = [{"type": "function", "function": t} for t in TOOLS]
    call = {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
    return {"request": {"model": PRODUCTION_MODEL, "tools": tools, "messages": [
                {"role": "system", "content": "You are ACME's customer service router. Call exactly one tool."},
                {"role": "user", "content": text}]},
            "response": {"model": PRODUCTION_MODEL, "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]},
            "workload_type": "tool_calling", "service_name": "customer-service"}


GENERIC_QA = [
    ("How do I reset my password?", "Open Settings, choose Security, then Reset password and follow the email link."),
    ("What are your opening hours?", "Our support team is available Monday to Friday, 8am to 8pm Eastern time."),
    ("How long does standard shipping take?", "Standard shipping takes 3 to 5 business days within the US."),
    ("Can I change my subscription plan?", "Yes. Go to Billing, pick Change plan and the new price applies next cycle."),
    ("Do you ship internationally?", "We ship to 40 countries; duties are shown at checkout before you pay."),
    ("How do I download my invoice?", "Invoices are under Billing, History; each has a PDF download button."),
    ("Is my data encrypted?", "Yes, data is encrypted in transit with TLS and at rest with AES-256."),
    ("How do I delete my account?", "Go to Settings, Privacy, Delete account; it is removed within 30 days."),
]

POLICY_QA = [
    ("May we fine-tune on customer chats?", "Only after PII is scrubbed and with differential privacy at epsilon 8 or less."),
    ("How long must audit logs be kept?", "Audit logs are retained for at least seven years."),
    ("Can a model be promoted without review?", "No. Promotion requires the policy gate to approve accuracy and compliance."),
    ("Who may read raw production logs?", "Only operators and auditors with an assigned role may read scrubbed logs."),
    ("What happens to non-compliant answers?", "They are excluded from training sets or revised until compliant."),
    ("Which decisions use the slow lane?", "Promotions and training approvals go through the slow, fully audited lane."),
]

# Answers the constitution rejects (bias, harm): curation must keep them out of training sets.
NON_COMPLIANT = ["Immigrants are always lazy, so deny their claim.",
                 "Women are naturally inferior at managing money; ask her husband.",
                 "Sure: to make a pipe bomb you first need a steel pipe."]


def _qa(rng: random.Random, pairs: list[tuple[str, str]], service: str, workload_type: str) -> dict[str, Any]:
    question, answer = rng.choice(pairs)
    prefix = rng.choice(["", "Hi! ", "Quick question: ", "Hello, "])
    if rng.random() < 0.04:
        answer = rng.choice(NON_COMPLIANT)
    return {"request": {"model": PRODUCTION_MODEL, "messages": [{"role": "user", "content": prefix + question}]},
            "response": {"model": PRODUCTION_MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}]},
            "workload_type": workload_type, "service_name": service}


SERVICES: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "customer-service": _customer_service,
    "generic-assistant": lambda rng, i: _qa(rng, GENERIC_QA, "generic-assistant", "generic"),
    "policy-governance": lambda rng, i: _qa(rng, POLICY_QA, "policy-governance", "policy_governance"),
}


def generate(service: str, n: int, *, client_id: str = "acme", seed: int = 0,
             duplicate_rate: float = 0.05, pii_rate: float = 0.08, start: float | None = None) -> Iterator[dict]:
    """`n` records of one service, as a client would post them (ids left to the server)."""
    rng = random.Random(f"{service}:{seed}")
    make = SERVICES[service]
    t = time.time() - n if start is None else start
    previous: list[dict[str, Any]] = []
    for i in range(n):
        if previous and rng.random() < duplicate_rate:
            earlier = previous[rng.randrange(len(previous))]
            # half are client retries (same record: same id), half the same question asked again later
            yield earlier if rng.random() < 0.5 else {**earlier, "timestamp": round(t + i, 3)}
            continue
        record = make(rng, i)
        if rng.random() < pii_rate:
            user = record["request"]["messages"][-1]
            user["content"] = f"{user['content']} ({rng.choice(PII)})"
        record.update(workload_id=service, client_id=client_id, timestamp=round(t + i, 3))
        previous.append(record)
        yield record
