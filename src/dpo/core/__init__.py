"""Interfaces and machinery of dpo-trainer. Imports no vendor SDK."""
