# A single-node Consul agent for development and compose.yml: server and client in one
# process, its state (including the services registered through the API and the ACL
# tokens) kept in the data dir, so a restarted agent still knows every model server.
# Model servers register themselves (see README.md here); nothing is declared in this file.

datacenter       = "dc1"
server           = true
bootstrap_expect = 1

# HTTP API (8500) and DNS on every interface of the container: the mesh and the model
# servers reach it as consul:8500 (compose publishes it on the host's 127.0.0.1 only).
# Gossip binds to the container's own address.
client_addr = "0.0.0.0"
bind_addr   = "{{ GetInterfaceIP \"eth0\" }}"

# Nothing without a token: servers register with a token that may only write
# aimesh-model-server, the mesh reads with one that may only read it (consul/policies,
# made by consul/acl-init.sh). The management token is not in this file: compose hands
# it over in CONSUL_LOCAL_CONFIG from the env file. Tokens set through the API (the
# agent's own) persist in the data dir.
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}

ui_config {
  enabled = true
}

log_level = "INFO"
