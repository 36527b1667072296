"""Recipes (data + model) and the runs built on them."""
