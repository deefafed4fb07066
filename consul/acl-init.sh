#!/bin/sh
# One-shot ACL set-up for compose.yml, run with the management token (CONSUL_HTTP_TOKEN):
# the policies in /policies and a token for each with the secret given in the environment
# (so the parties can be handed their token before it exists), and the agent's own token,
# persisted by the agent (enable_token_persistence). Safe to run again: existing policies
# and tokens are kept.
set -eu

policy() {  # name file
  consul acl policy read -name "$1" >/dev/null 2>&1 \
    || consul acl policy create -name "$1" -rules @"$2" >/dev/null
}

token() {  # policy secret description
  CONSUL_HTTP_TOKEN="$2" consul acl token read -self >/dev/null 2>&1 \
    || consul acl token create -policy-name "$1" -secret "$2" -description "$3" >/dev/null
}

policy aimesh-model-server /policies/model-server.hcl
policy aimesh-discovery /policies/discovery.hcl
policy consul-agent /policies/agent.hcl
token aimesh-model-server "$AIMESH_CONSUL_SERVER_TOKEN" "aimesh model servers: register"
token aimesh-discovery "$AIMESH_CONSUL_DISCOVERY_TOKEN" "aimesh discovery: read"
token consul-agent "$CONSUL_AGENT_TOKEN" "the Consul agent"
consul acl set-agent-token agent "$CONSUL_AGENT_TOKEN" >/dev/null
echo "Consul ACLs ready: policies aimesh-model-server, aimesh-discovery, consul-agent"
