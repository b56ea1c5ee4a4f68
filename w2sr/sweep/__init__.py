"""Sweeps: many teachers x students x training sets x seeds as one job (`w2sr sweep`)."""
