#!/bin/sh
# Run a command inside a fresh network namespace whose only interface is loopback, when we can
# (root + unshare + ip): Ray then binds to 127.0.0.1 instead of the machine's primary address, and the
# run proves it needs no network. Elsewhere (not root, no unshare, SKINSWEEP_NO_NETNS=1) run directly.
if [ "${SKINSWEEP_NO_NETNS:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 \
   && command -v ip >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
exec "$@"
