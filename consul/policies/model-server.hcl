# Model servers: register and deregister `aimesh-model-server` instances, nothing else.
service "aimesh-model-server" {
  policy = "write"
}
node_prefix "" {
  policy = "read"
}
