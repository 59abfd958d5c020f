"""Synthetic production traffic for tests and benchmarks: a customer-service tool router.

Records are shaped like the OpenAI ChatCompletion request/response pairs real services
log: 6 tools, varied user phrasings with slot values, and the production model's answer
as one tool call whose `arguments` is a JSON string (as the OpenAI API returns it).
"""
from __future__ import annotations

import json
import random
from typing import Any

SYSTEM = "You are the customer-service router of ShopCo. Pick the right tool."


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                       "required": list(params)}}}


TOOLS = [
    _tool("get_order_status", "Status of an order", order_id="string"),
    _tool("track_shipment", "Where a parcel is", tracking_number="string"),
    _tool("initiate_return", "Start a return", order_id="string", reason="string"),
    _tool("update_address", "Change the delivery address of an order", order_id="string", new_address="string"),
    _tool("check_product_availability", "Stock of a product near a zip code", product_id="string", zip="string"),
    _tool("escalate_to_human", "Hand over to a human agent", reason="string"),
]

REASONS = ["it arrived damaged", "wrong size", "I changed my mind", "the color is different", "it stopped working",
           "it was a duplicate order"]
ADDRESSES = ["12 Oak Street, Springfield", "400 Main Ave, Portland", "9 Elm Road, Austin", "77 Pine Lane, Denver",
             "5 Lake Drive, Madison"]
COMPLAINTS = ["I have been charged twice", "nobody answers my emails", "your bot is useless",
              "I want to file a complaint", "this is the third time I ask", "I need to talk to a manager"]

PHRASINGS: dict[str, list[str]] = {
    "get_order_status": ["Where is my order {order_id}?", "What's the status of order {order_id}?",
                         "Has order {order_id} shipped yet?", "Can you check on my order {order_id} please",
                         "any update on {order_id}?", "I ordered something, number {order_id}, is it on the way?"],
    "track_shipment": ["Track package {tracking_number}", "Where is my parcel? Tracking number {tracking_number}",
                       "Can you trace shipment {tracking_number}?", "tracking {tracking_number} - where is it now?",
                       "The courier gave me {tracking_number}, where's the box?"],
    "initiate_return": ["I want to return order {order_id} because {reason}",
                        "Please start a return for {order_id}, {reason}", "Return {order_id}: {reason}",
                        "How do I send back order {order_id}? {reason}", "I'd like a refund on {order_id}, {reason}"],
    "update_address": ["Change the shipping address of {order_id} to {new_address}",
                       "Please deliver order {order_id} to {new_address} instead",
                       "I moved, send {order_id} to {new_address}", "New address for order {order_id}: {new_address}"],
    "check_product_availability": ["Is product {product_id} in stock near {zip}?",
                                   "Can I buy {product_id} in a store around {zip}?",
                                   "Do you have {product_id} available for zip code {zip}?",
                                   "check availability of item {product_id} at {zip}"],
    "escalate_to_human": ["Let me speak to a human, {reason}", "{reason}. Get me a real person.",
                          "I need a human agent: {reason}", "Transfer me to support staff, {reason}"],
}


def _slots(tool: str, rng: random.Random) -> dict[str, str]:
    order = f"ORD-{rng.randint(10000, 99999)}"
    return {
        "get_order_status": lambda: {"order_id": order},
        "track_shipment": lambda: {"tracking_number": f"1Z{rng.randint(100000, 999999)}"},
        "initiate_return": lambda: {"order_id": order, "reason": rng.choice(REASONS)},
        "update_address": lambda: {"order_id": order, "new_address": rng.choice(ADDRESSES)},
        "check_product_availability": lambda: {"product_id": f"SKU-{rng.randint(1000, 9999)}",
                                               "zip": f"{rng.randint(10000, 99999)}"},
        "escalate_to_human": lambda: {"reason": rng.choice(COMPLAINTS)},
    }[tool]()


def customer_service_records(n: int, *, seed: int = 0, workload_id: str = "customer-service",
                             client_id: str = "acme", start_ts: float = 1_700_000_000.0) -> list[dict[str, Any]]:
    """`n` records, tools uniform at random, every user turn different."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        tool = rng.choice(list(PHRASINGS))
        args = _slots(tool, rng)
        text = rng.choice(PHRASINGS[tool]).format(**args)
        records.append({
            "id": f"{workload_id}-{seed}-{i}", "timestamp": start_ts + i,
            "workload_id": workload_id, "client_id": client_id, "workload_type": "tool_calling",
            "request": {"model": "gpt-4o", "tools": TOOLS,
                        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]},
            "response": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": f"call_{i}", "type": "function",
                                "function": {"name": tool, "arguments": json.dumps(args)}}]}}]},
        })
    return records


def generic_records(n: int, *, seed: int = 0, workload_id: str = "faq", client_id: str = "acme") -> list[dict]:
    """A plain question-answer workload (no tools)."""
    rng = random.Random(seed)
    topics = ["shipping", "returns", "warranty", "payments", "gift cards", "membership"]
    records = []
    for i in range(n):
        topic = rng.choice(topics)
        records.append({
            "id": f"{workload_id}-{seed}-{i}", "timestamp": 1_700_000_000.0 + i, "workload_id": workload_id,
            "client_id": client_id, "workload_type": "generic",
            "request": {"messages": [{"role": "user", "content": f"Question {i}: how does {topic} work?"}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": f"Our {topic} policy is simple."}}]},
        })
    return records
