"""Pure data work for a flywheel job: curation, splits and in-context example selection."""
