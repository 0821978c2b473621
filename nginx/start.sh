#!/bin/sh
# Entry point of the compose nginx: fill in this container's nameserver, then run nginx in the foreground.
# The DNS server differs between engines (Docker's embedded 127.0.0.11, podman's at the network gateway), so
# it is read from /etc/resolv.conf at start rather than written into nginx/nginx.conf.
set -eu

# Paths as in the image (nginx/Dockerfile); tests point them elsewhere.
template=${NGINX_CONF_TEMPLATE:-/etc/nginx/boolq/nginx.conf}
conf=${NGINX_CONF:-/etc/nginx/nginx.conf}
resolv_conf=${RESOLV_CONF:-/etc/resolv.conf}

# The first nameserver only, the one libc asks first: nginx takes turns between its resolvers, and those after
# the engine's own DNS (podman lists the host's) answer "not found" for the service names.
nameserver=$(awk '$1 == "nameserver" { print ($2 ~ /:/) ? "[" $2 "]" : $2; exit }' "$resolv_conf")
if [ -z "$nameserver" ]; then
    echo "boolq-nginx-start: no nameserver in $resolv_conf" >&2
    exit 1
fi

# The replicas answer only requests carrying EDGE_SECRET (app/config.py: 16 to 256 of A-Z a-z 0-9 _ -).
edge_secret=${EDGE_SECRET:-}
if ! printf '%s' "$edge_secret" | grep -Eqx '[A-Za-z0-9_-]{16,256}'; then
    echo "boolq-nginx-start: EDGE_SECRET must be 16 to 256 letters, digits, _ or - (the replicas' EDGE_SECRET)" >&2
    exit 1
fi

# `server … resolve` (re-resolution of upstream names) exists in open-source nginx from 1.27.3.
version=$(nginx -v 2>&1 | sed 's|^.*nginx/||')
if echo "$version" | awk -F. '{ exit !($1 > 1 || ($1 == 1 && ($2 > 27 || ($2 == 27 && $3 >= 3)))) }'; then
    keep_resolve=''
else
    keep_resolve='s| resolve;$|;|'
fi
# The config holds the secret: readable by the container's root only (nginx's master reads it before it forks).
umask 077
sed -e "s|__NAMESERVER__|$nameserver|" -e "s|__EDGE_SECRET__|$edge_secret|" -e "$keep_resolve" "$template" >"$conf"

addresses() {
    for name in "$@"; do getent ahostsv4 "$name" | awk '{ print $1 }'; done | sort -u
}

# Older nginx resolves upstream names only when it loads its configuration: reload it whenever the addresses
# behind them change (replicas scaled up or down, or restarted with a new address).
watch_upstream_names() {
    names=$(awk '$1 == "server" && $2 ~ /:[0-9]+$/ { sub(/:[0-9]+$/, "", $2); print $2 }' "$conf" | sort -u)
    known=$(addresses $names)
    while sleep 10; do
        current=$(addresses $names)
        if [ -n "$current" ] && [ "$current" != "$known" ]; then
            echo "boolq-nginx-start: addresses of $(echo $names) changed, reloading nginx" >&2
            nginx -c "$conf" -s reload && known=$current
        fi
    done
}

if grep -q ' resolve;$' "$conf"; then
    echo "boolq-nginx-start: nginx $version, resolver $nameserver, upstream names re-resolved by nginx" >&2
elif command -v getent >/dev/null; then
    echo "boolq-nginx-start: nginx $version, resolver $nameserver, reload when upstream addresses change" >&2
    watch_upstream_names &
else
    echo "boolq-nginx-start: nginx $version has no upstream re-resolution and getent is missing: upstream" \
        "names are resolved once, at start" >&2
fi
exec nginx -c "$conf" -g 'daemon off;'
