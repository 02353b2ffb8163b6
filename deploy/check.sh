#!/usr/bin/env bash
# Checks the deployment files with the tools that read them: systemd-analyze
# verify (the unit), nginx -t, haproxy -c, caddy validate, promtool check
# rules and promtool test rules.
# A missing tool is reported and skipped; with DEPLOY_CHECK_STRICT=1 (CI,
# which installs them) it is an error.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
skipped=()

have() {
	if command -v "$1" >/dev/null; then return 0; fi
	if [ "${DEPLOY_CHECK_STRICT:-0}" = 1 ]; then
		echo "FAIL: $1 is not installed (Debian package: $2)"; failed=1
	else
		echo "SKIP: $1 is not installed (Debian package: $2)"; skipped+=("$1")
	fi
	return 1
}
check() { # name, command...
	local name=$1; shift
	if out=$("$@" 2>&1); then
		echo "ok:   $name"
	else
		echo "FAIL: $name"; echo "$out" | sed 's/^/      /'; failed=1
	fi
}

# A throwaway certificate for the configurations that load one (Go's own
# generator: CI has Go, not necessarily openssl).
(cd "$tmp" && go run "$(go env GOROOT)/src/crypto/tls/generate_cert.go" --host mediator.example.org --ecdsa-curve P256 >/dev/null 2>&1)
cat "$tmp/cert.pem" "$tmp/key.pem" > "$tmp/combined.pem"

if have systemd-analyze systemd; then
	# verify wants the binary to exist: point ExecStart at a stand-in.
	printf '#!/bin/sh\n' > "$tmp/mediator" && chmod +x "$tmp/mediator"
	# verify warns about unknown keys and bad values but exits 0: any
	# output is a failure.
	verify_unit() {
		local out
		out=$(systemd-analyze verify --man=no "$1" 2>&1) || { echo "$out"; return 1; }
		[ -z "$out" ] || { echo "$out"; return 1; }
	}
	for unit in mediator.service mediator-haproxy-sync.service; do
		sed "s|/usr/local/bin/mediator|$tmp/mediator|" "systemd/$unit" > "$tmp/$unit"
		check "systemd-analyze verify systemd/$unit" verify_unit "$tmp/$unit"
	done
fi

if have nginx nginx; then
	sed -e "s|/etc/ssl/mediator/fullchain.pem|$tmp/cert.pem|" -e "s|/etc/ssl/mediator/privkey.pem|$tmp/key.pem|" \
		nginx/mediator.conf > "$tmp/mediator-nginx.conf"
	cat > "$tmp/nginx.conf" <<CONF
pid $tmp/nginx.pid;
error_log stderr;
events {}
http {
    access_log off;
    include $tmp/mediator-nginx.conf;
}
CONF
	check "nginx -t nginx/mediator.conf" nginx -t -q -e stderr -p "$tmp" -c "$tmp/nginx.conf"
fi

if have haproxy haproxy; then
	: > "$tmp/mediator-shards.map"
	for cfg in haproxy.cfg haproxy-cluster.cfg; do
		sed -e "s|/etc/haproxy/certs/mediator.pem|$tmp/combined.pem|" \
			-e "s|/etc/haproxy/mediator-shards.map|$tmp/mediator-shards.map|" \
			"haproxy/$cfg" > "$tmp/$cfg"
		check "haproxy -c haproxy/$cfg" haproxy -c -q -f "$tmp/$cfg"
	done
fi

if have caddy caddy; then
	check "caddy validate caddy/Caddyfile" \
		env HOME="$tmp" XDG_DATA_HOME="$tmp" XDG_CONFIG_HOME="$tmp" caddy validate --adapter caddyfile --config caddy/Caddyfile
fi

if have promtool prometheus; then
	check "promtool check rules prometheus/mediator-rules.yml" promtool check rules prometheus/mediator-rules.yml
	check "promtool test rules prometheus/mediator-rules.test.yml" promtool test rules prometheus/mediator-rules.test.yml
fi

# The dashboard's JSON and the metric names in it and in the rules are
# checked by TestDeployMetricsExist (integration/), which runs in make test.
# What the proxy configurations do with a device is tested by running them
# (TestDeployNginx, TestDeployHAProxy, TestDeployCaddy in integration/,
# TestHAProxyClusterShipped in integration/cluster), also in make test.

if [ ${#skipped[@]} -gt 0 ]; then
	echo "skipped (not installed): ${skipped[*]}"
fi
exit $failed
