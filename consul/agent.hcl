# A single-node Consul agent for development and compose.yml: server and client in one
# process, its state (including the services registered through the API) kept in the
# data dir, so a restarted agent still knows every model server.
# Model servers register themselves (see README.md here); nothing is declared in this file.

datacenter       = "dc1"
server           = true
bootstrap_expect = 1

# HTTP API (8500) and DNS on every interface of the container: the mesh and the model
# servers reach it as consul:8500. Gossip binds to the container's own address.
client_addr = "0.0.0.0"
bind_addr   = "{{ GetInterfaceIP \"eth0\" }}"

ui_config {
  enabled = true
}

log_level = "INFO"
