# Sourced by the check scripts: throwaway certificates made with openssl (Debian's openssl
# installed if missing), valid for a day, EC P-256.
#
#   certs_ca DIR                 # DIR/ca.pem, DIR/ca.key: a CA
#   certs_leaf DIR NAME SAN EKU  # DIR/NAME.pem, DIR/NAME.key signed by DIR's CA, e.g.
#                                # certs_leaf "$dir" server 'DNS:localhost, IP:127.0.0.1' serverAuth
# Each prints openssl's chatter on stderr; a failure returns non-zero.

certs_ca() {
  if ! command -v openssl >/dev/null; then
    echo "openssl not found: installing Debian's openssl" >&2
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" apt-get install -y openssl >&2
  fi
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj '/CN=tollgate test CA' -addext 'basicConstraints=critical,CA:TRUE' \
    -addext 'keyUsage=critical,keyCertSign,cRLSign' -keyout "$1/ca.key" -out "$1/ca.pem" >&2
}

certs_leaf() {
  local dir=$1 name=$2 san=$3 eku=$4
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" >&2 &&
    printf '%s\n' "subjectAltName = $san" 'basicConstraints = critical, CA:FALSE' \
      'keyUsage = critical, digitalSignature' "extendedKeyUsage = $eku" >"$dir/$name.ext" &&
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 1 -extfile "$dir/$name.ext" -out "$dir/$name.pem" >&2
}
