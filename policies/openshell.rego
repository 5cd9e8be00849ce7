# OpenShell egress decision: one query, data.openshell.sandbox.decision, per
# connection (and per HTTP request when the proxy inspects L7).
#
# input:
#   exec:    {path: "/usr/bin/curl", ancestors: ["/usr/bin/bash", ...]}
#            resolved executable paths (never argv[0]) of the caller and its
#            ancestor processes
#   network: {host: "pypi.org", port: 443}   host already lowercased, no
#            trailing dot
#   request: {method: "GET", path: "/simple/"}   absent for CONNECT tunnels
#            (the path already normalised by the proxy)
#
# data.network_policies: built by openshell-policy from the validated policy:
#   {<key>: {name, binaries: [pattern], endpoints: [{host (string or null),
#    ports: [int], enforcement: "enforce"|"audit"|"ask", access (string or null),
#    rules: [{method, path}], deny_rules: [{method, path}],
#    allowed_ips: [cidr], tls: "terminate"|"passthrough"|null,
#    protocol: "rest"|"websocket"|"tcp"|null}]}}
#
# Matching:
#   host     exact, or glob with "." as delimiter: "*" stays inside one DNS
#            label ("*.pythonhosted.org" matches "files.pythonhosted.org", not
#            "pythonhosted.org" nor "a.b.pythonhosted.org"); "**" crosses
#            labels. A hostless endpoint (host null, allowed_ips set) matches
#            any host; the proxy then checks the resolved IPs.
#   port     one of the endpoint's ports.
#   binary   exact path, or glob with "/" as delimiter, against the caller's
#            path or any ancestor's path. A policy without binaries matches
#            no process.
#   L7       only when input.request is present. access read-only = GET, HEAD,
#            OPTIONS; read-write = those plus POST, PUT, PATCH, DELETE; full =
#            any method. rules allow a method ("*" = any) and a path glob
#            ("**" = any path). deny_rules override both. No access and no
#            rules = any request.
#   audit    an endpoint with enforcement "audit" whose host, port and binary
#            match allows the request even when its L7 rules would not; the
#            decision then has enforcement "audit" and the reason says what
#            would have been denied. Audit never opens host, port or binary.
#   ask      an endpoint with enforcement "ask" matches exactly as "enforce"
#            does; an allow through it has enforcement "ask", and the proxy
#            holds the connection or request until a person answers (or lets
#            it through at once when that endpoint and binary were approved
#            for the sandbox's lifetime). Among full matches one that does
#            not ask comes first, so asking never holds what another policy
#            allows outright.
#
# CONNECT (no input.request): the decision's "connect" says how the tunnel
# is carried. An endpoint without L7 constraints (no access, rules or
# deny_rules) and without tls: terminate is a plain "tunnel". With
# tls: terminate it is "terminate" (the proxy terminates TLS and decides
# every request inside). An endpoint with L7 constraints and without
# tls: terminate cannot have them enforced on a tunnel: the CONNECT is
# denied ("deny", missing "tls"), unless the endpoint is in audit mode,
# which tunnels it and says what would have been denied. Among several
# matching endpoints a plain tunnel comes first, then an audited one, then
# termination, then the refusal. For requests, "connect" is null.
#
# When several policies allow, the lexicographically smallest key wins
# (deterministic, no rule conflicts), after the refusals and the ask
# endpoints have been put last. An allow names its endpoint ("endpoint": its
# index in the winning policy's endpoints). An allowed request's "websocket" says
# whether the endpoint that allowed it has protocol: websocket (the proxy
# lets an Upgrade: websocket request through only then).

package openshell.sandbox

policies := object.get(data, "network_policies", {})

req_host := lower(input.network.host)

req_port := input.network.port

has_request if {
	input.request
}

req_method := upper(input.request.method)

req_path := input.request.path

exec_paths := array.concat([input.exec.path], object.get(input.exec, "ancestors", []))

# --- host ------------------------------------------------------------------

host_ok(ep) if {
	is_string(ep.host)
	not contains(ep.host, "*")
	ep.host == req_host
}

host_ok(ep) if {
	is_string(ep.host)
	contains(ep.host, "*")
	glob.match(ep.host, ["."], req_host)
}

host_ok(ep) if {
	ep.host == null
	count(ep.allowed_ips) > 0
}

# --- port ------------------------------------------------------------------

port_ok(ep) if {
	some p in ep.ports
	p == req_port
}

# --- binary ----------------------------------------------------------------

binary_ok(pol) if {
	some b in pol.binaries
	not contains(b, "*")
	some p in exec_paths
	p == b
}

binary_ok(pol) if {
	some b in pol.binaries
	contains(b, "*")
	some p in exec_paths
	glob.match(b, ["/"], p)
}

# --- L7 --------------------------------------------------------------------

access_methods := {
	"read-only": {"GET", "HEAD", "OPTIONS"},
	"read-write": {"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"},
}

method_matches(pattern) if pattern == "*"

method_matches(pattern) if pattern == req_method

path_matches(pattern) if pattern == "**"

path_matches(pattern) if {
	pattern != "**"
	glob.match(pattern, ["/"], req_path)
}

unrestricted(ep) if {
	ep.access == null
	count(ep.rules) == 0
}

# The method is allowed by the base set for some path.
method_ok(ep) if unrestricted(ep)

method_ok(ep) if ep.access == "full"

method_ok(ep) if req_method in access_methods[ep.access]

method_ok(ep) if {
	some r in ep.rules
	method_matches(r.method)
}

# Method and path are allowed by the base set.
base_ok(ep) if unrestricted(ep)

base_ok(ep) if ep.access == "full"

base_ok(ep) if req_method in access_methods[ep.access]

base_ok(ep) if {
	some r in ep.rules
	method_matches(r.method)
	path_matches(r.path)
}

denied_by_rule(ep) if {
	some r in ep.deny_rules
	method_matches(r.method)
	path_matches(r.path)
}

l7_ok(ep) if not has_request

l7_ok(ep) if {
	has_request
	base_ok(ep)
	not denied_by_rule(ep)
}

# --- CONNECT: how a tunnel to a matching endpoint is carried -----------------

l7_constrained(ep) if ep.access != null

l7_constrained(ep) if count(ep.rules) > 0

l7_constrained(ep) if count(ep.deny_rules) > 0

terminates(ep) if ep.tls == "terminate"

# 0: a plain tunnel; 1: a tunnel only because the endpoint audits; 2: TLS
# termination; 3: refused (L7 constraints a tunnel cannot enforce).
connect_rank(ep) := 0 if {
	not terminates(ep)
	not l7_constrained(ep)
}

connect_rank(ep) := 1 if {
	not terminates(ep)
	l7_constrained(ep)
	ep.enforcement == "audit"
}

connect_rank(ep) := 2 if terminates(ep)

connect_rank(ep) := 3 if {
	not terminates(ep)
	l7_constrained(ep)
	ep.enforcement != "audit"
}

connect_modes := ["tunnel", "tunnel", "terminate", "deny"]

# Requests are decided as they are; only CONNECT ranks its matches.
match_rank(_) := 0 if has_request

match_rank(ep) := connect_rank(ep) if not has_request

connect_of(_) := null if has_request

connect_of(rank) := connect_modes[rank] if not has_request

# --- what is missing for one (policy, endpoint) pair -----------------------

part_missing("host", _, ep) if not host_ok(ep)

part_missing("port", _, ep) if not port_ok(ep)

part_missing("binary", pol, _) if not binary_ok(pol)

part_missing("method", _, ep) if {
	has_request
	not method_ok(ep)
}

part_missing("path", _, ep) if {
	has_request
	method_ok(ep)
	not l7_ok(ep)
}

parts := ["host", "port", "binary", "method", "path"]

missing_for(pol, ep) := [x | some x in parts; part_missing(x, pol, ep)]

# One candidate per (policy, endpoint), sortable so that the first is the
# closest: fewest missing parts, then a matching host before a matching port
# (a right host with a wrong binary is closer than a wrong host), then key
# order and endpoint order.
# [count missing, host missing (0/1), port missing (0/1), key, index, missing]
candidates := [[count(m), flag("host", m), flag("port", m), key, i, m] |
	some key, pol in policies
	some i, ep in pol.endpoints
	m := missing_for(pol, ep)
]

flag(x, m) := 1 if x in m

flag(x, m) := 0 if not x in m

refused_rank(3) := 1

refused_rank(r) := 0 if r != 3

asks(ep) := 1 if ep.enforcement == "ask"

asks(ep) := 0 if ep.enforcement != "ask"

# [refused, asks, rank, key, index]: a match that can be carried before a
# refused one, one that does not ask before one that asks, then (CONNECT)
# the way the tunnel is carried.
full_matches := sort([[refused_rank(r), asks(ep), r, key, i] |
	some c in candidates
	c[0] == 0
	key := c[3]
	i := c[4]
	ep := policies[key].endpoints[i]
	r := match_rank(ep)
])

first_match := full_matches[0]

l7_parts := {"method", "path"}

audit_matches := sort([[key, i, m] |
	some c in candidates
	c[0] > 0
	key := c[3]
	i := c[4]
	m := c[5]
	policies[key].endpoints[i].enforcement == "audit"
	every x in m {
		x in l7_parts
	}
])

closest := sort(candidates)[0]

request_text := sprintf("%s %s", [req_method, req_path]) if has_request

request_text := "connection" if not has_request

target := sprintf("%s:%d", [req_host, req_port])

# --- suggestions -----------------------------------------------------------

suggest_part("host", key) := sprintf("add an endpoint { host: %s, port: %d } to network_policies.%s", [req_host, req_port, key])

suggest_part("port", key) := sprintf("add port %d to the endpoint for %s in network_policies.%s", [req_port, req_host, key])

suggest_part("binary", key) := sprintf("add binaries: [{ path: %s }] to network_policies.%s", [input.exec.path, key])

suggest_part("method", key) := sprintf("allow method %s for %s in network_policies.%s (access or rules)", [req_method, req_host, key])

suggest_part("path", key) := sprintf("allow %s %s for %s in network_policies.%s (rules)", [req_method, req_path, req_host, key])

# --- the decision ----------------------------------------------------------

default decision := {
	"allow": false,
	"policy": null,
	"enforcement": "enforce",
	"reason": "no decision could be made; denied",
	"missing": [],
	"closest_policy": null,
	"suggestion": null,
	"allowed_ips": [],
	"connect": null,
	"websocket": false,
}

websocket_of(ep) if ep.protocol == "websocket"

websocket(ep) := true if websocket_of(ep)

websocket(ep) := false if not websocket_of(ep)

connect_denied := null if has_request

connect_denied := "deny" if not has_request

decision := d if {
	count(full_matches) > 0
	first_match[2] != 1
	first_match[2] < 3
	rank := first_match[2]
	key := first_match[3]
	ep := policies[key].endpoints[first_match[4]]
	d := {
		"allow": true,
		"policy": key,
		"endpoint": first_match[4],
		"enforcement": ep.enforcement,
		"reason": sprintf("%s to %s by %s allowed by policy %s", [request_text, target, input.exec.path, key]),
		"missing": [],
		"closest_policy": null,
		"suggestion": null,
		"allowed_ips": ep.allowed_ips,
		"connect": connect_of(rank),
		"websocket": websocket(ep),
	}
}

tls_suggestion(key) := sprintf("add tls: terminate to the endpoint for %s in network_policies.%s, so that its method and path rules apply to every request", [req_host, key])

# A tunnel to an audited endpoint whose method/path rules it cannot enforce.
decision := d if {
	count(full_matches) > 0
	first_match[2] == 1
	key := first_match[3]
	ep := policies[key].endpoints[first_match[4]]
	d := {
		"allow": true,
		"policy": key,
		"endpoint": first_match[4],
		"enforcement": "audit",
		"reason": sprintf("audit: %s to %s by %s would be denied by policy %s (its method and path rules need tls: terminate; a tunnel cannot enforce them); allowed because the endpoint is in audit mode", [request_text, target, input.exec.path, key]),
		"missing": ["tls"],
		"closest_policy": key,
		"suggestion": tls_suggestion(key),
		"allowed_ips": ep.allowed_ips,
		"connect": "tunnel",
		"websocket": false,
	}
}

# Every match has method/path rules that only termination could enforce.
decision := d if {
	count(full_matches) > 0
	first_match[2] == 3
	key := first_match[3]
	d := {
		"allow": false,
		"policy": null,
		"enforcement": "enforce",
		"reason": sprintf("denied: policy %s allows %s to %s by %s only under its method and path rules (access, rules or deny_rules), which a CONNECT tunnel cannot enforce: they need tls: terminate on the endpoint", [key, request_text, target, input.exec.path]),
		"missing": ["tls"],
		"closest_policy": key,
		"suggestion": tls_suggestion(key),
		"allowed_ips": [],
		"connect": "deny",
		"websocket": false,
	}
}

decision := d if {
	count(full_matches) == 0
	count(audit_matches) > 0
	key := audit_matches[0][0]
	ep := policies[key].endpoints[audit_matches[0][1]]
	m := audit_matches[0][2]
	d := {
		"allow": true,
		"policy": key,
		"endpoint": audit_matches[0][1],
		"enforcement": "audit",
		"reason": sprintf("audit: %s to %s would be denied by policy %s (missing %s); allowed because the endpoint is in audit mode", [request_text, target, key, concat(", ", m)]),
		"missing": m,
		"closest_policy": key,
		"suggestion": concat("; ", [suggest_part(x, key) | some x in m]),
		"allowed_ips": ep.allowed_ips,
		"connect": null,
		"websocket": websocket(ep),
	}
}

decision := d if {
	count(full_matches) == 0
	count(audit_matches) == 0
	count(candidates) > 0
	key := closest[3]
	m := closest[5]
	d := {
		"allow": false,
		"policy": null,
		"enforcement": "enforce",
		"reason": sprintf("denied: no policy allows %s to %s by %s; closest policy %s is missing %s", [request_text, target, input.exec.path, key, concat(", ", m)]),
		"missing": m,
		"closest_policy": key,
		"suggestion": concat("; ", [suggest_part(x, key) | some x in m]),
		"allowed_ips": [],
		"connect": connect_denied,
		"websocket": false,
	}
}

decision := d if {
	count(candidates) == 0
	d := {
		"allow": false,
		"policy": null,
		"enforcement": "enforce",
		"reason": sprintf("denied: no network policies with endpoints are defined, so all egress is denied (%s to %s by %s)", [request_text, target, input.exec.path]),
		"missing": ["host", "port", "binary"],
		"closest_policy": null,
		"suggestion": sprintf("add a network_policies entry with endpoint { host: %s, port: %d } and binaries: [{ path: %s }]", [req_host, req_port, input.exec.path]),
		"allowed_ips": [],
		"connect": connect_denied,
		"websocket": false,
	}
}
