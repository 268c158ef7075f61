"""Training: LLaVA's two-stage visual instruction tuning, LoRA, and the synthetic shapes world."""
