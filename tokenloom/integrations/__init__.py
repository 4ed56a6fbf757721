"""tokenloom.integrations: adapters that plug tokenloom into model libraries (Hugging Face, ...)."""
