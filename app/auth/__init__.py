"""API keys, tenants and roles: who is calling, and which objects they may see."""
