"""Tenants: who may use Tandem, with which keys, within which budgets, at which prices, and what it cost."""
