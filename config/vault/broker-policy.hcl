# Vault/OpenBao policy for the Pleo Key Broker (BROKER_STORE=vault).
# Written for BROKER_VAULT_MOUNT=secret (a KV v2 engine) and BROKER_VAULT_PREFIX=pleo-broker;
# replace "secret/" and "pleo-broker/" if you change them. It grants nothing outside the prefix.

# Read, create and update a tenant's record (writes are check-and-set; reads may name a version).
path "secret/data/pleo-broker/tenants/*" {
  capabilities = ["create", "read", "update"]
}

# List the tenants (LIST secret/metadata/pleo-broker/tenants/).
path "secret/metadata/pleo-broker/tenants/" {
  capabilities = ["list"]
}

# Read a tenant's version list (which versions still hold key material) and, on disconnect,
# delete its metadata together with every version.
path "secret/metadata/pleo-broker/tenants/*" {
  capabilities = ["read", "delete"]
}

# Destroy old versions after a key rotation and on disconnect, so no old key stays readable.
path "secret/destroy/pleo-broker/tenants/*" {
  capabilities = ["update"]
}

# The change journal: which tenants changed lately, so replicas re-read only those. Holds
# tenant ids and counters, never a key. Appends are check-and-set read-modify-writes.
path "secret/data/pleo-broker/journal" {
  capabilities = ["create", "read", "update"]
}

# Keep few old versions of the journal (max_versions is set once, when it is created).
path "secret/metadata/pleo-broker/journal" {
  capabilities = ["update"]
}

# Connect sessions (one-time links to the connect page), one secret each, named by the SHA-256
# of the link's token. Hold a tenant id, an expiry and a counter, never a key or a token.
path "secret/data/pleo-broker/connect-sessions/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/pleo-broker/connect-sessions/" {
  capabilities = ["list"]
}

path "secret/metadata/pleo-broker/connect-sessions/*" {
  capabilities = ["read", "delete"]
}

# The event log (docs/contract.md, "Events"): append-only chunks of events, each a tenant's
# view (never a key). Appends are check-and-set; retention deletes whole old chunks.
path "secret/data/pleo-broker/events/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/pleo-broker/events/" {
  capabilities = ["list"]
}

path "secret/metadata/pleo-broker/events/*" {
  capabilities = ["delete"]
}

# Webhook delivery state (docs/contract.md, "Webhooks"): the cursor into the event log, the
# events not yet delivered (tenant views, never a key) and the lease of the replica delivering.
# Check-and-set read-modify-writes; few old versions are kept (set when it is created).
path "secret/data/pleo-broker/delivery" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/pleo-broker/delivery" {
  capabilities = ["update"]
}

# The broker's own token: look it up (token auth learns its TTL) and renew it before it expires.
# Vault's "default" policy grants these too; they are repeated so the broker also works with
# token_no_default_policy=true.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
