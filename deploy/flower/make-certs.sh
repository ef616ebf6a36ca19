#!/usr/bin/env bash
# Creates a private CA and a TLS certificate for the SuperLink host given as $1.
set -euo pipefail
host="${1:?usage: make-certs.sh SUPERLINK_HOSTNAME}"
out="$(dirname "$0")/certs"
mkdir -p "$out"
umask 077
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=facefed Flower CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt"
openssl req -newkey rsa:4096 -nodes -subj "/CN=$host" \
  -keyout "$out/server.key" -out "$out/server.csr"
printf "subjectAltName=DNS:%s,IP:127.0.0.1\n" "$host" > "$out/san.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days 365 -extfile "$out/san.ext" -out "$out/server.crt"
echo "certificates in $out (keep ca.key offline)"
