# The Consul agent's own token: keep its node in the catalog and sync the services and
# checks registered through it.
node_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
