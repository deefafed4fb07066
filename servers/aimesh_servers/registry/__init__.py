"""The model registry (declarative file) and service discovery (local or Consul)."""
