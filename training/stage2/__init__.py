"""Stage II, personalization: IP-Adapter on SDXL trained on (standardized reference, target) pairs (paper §3.4)."""
