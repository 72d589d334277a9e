"""Stage I, standardization: any picture of a character -> its standard form (paper §3.3)."""
