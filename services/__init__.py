"""orderflow services: one package per process."""
