# The agent's TLS settings, for its gRPC health checks of model servers that serve mutual
# TLS (`aimesh up --mtls`, compose.yml): with enable_agent_tls_for_checks a check that asks
# for TLS (GRPCUseTLS) verifies the server against ca_file, for the name the check gives
# (TLSServerName "model-server"), and presents cert_file as the client certificate.
# The files are the consul-agent identity of `aimesh certs init` (the certs volume in
# compose); Consul re-reads them on SIGHUP (`consul reload`), not by itself.
# Neither the HTTP API nor gossip changes: no https port is opened, nothing is verified
# on incoming connections.

enable_agent_tls_for_checks = true

tls {
  defaults {
    ca_file   = "/certs/ca-bundle.pem"
    cert_file = "/certs/consul-agent/cert.pem"
    key_file  = "/certs/consul-agent/key.pem"
  }
}
