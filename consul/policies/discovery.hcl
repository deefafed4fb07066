# The mesh's discovery (aimesh up --consul): read the model servers and their health, nothing else.
service "aimesh-model-server" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
