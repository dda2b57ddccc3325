#!/usr/bin/env bash
# Prints the Debian mirror this machine's apt sources already use (the URI of the first
# enabled "deb" entry for a Debian suite in /etc/apt/sources.list and
# /etc/apt/sources.list.d/*.list / *.sources, one-line and deb822 formats alike), so that
# the scripts that fetch from Debian outside apt's own sources (the bookworm-backports
# entry, mmdebstrap's sid root, QEMU's source tarball) use the same mirror as apt does and
# the repository names none. Snapshot and security archives are not mirrors of the main
# archive and are skipped, and so is the entry ci/install-deps.sh writes itself.
# APT_SOURCES_DIR (default /etc/apt) lets a test point it at other files.
set -euo pipefail
etc=${APT_SOURCES_DIR:-/etc/apt}
own=daxd-bookworm-backports.sources

files=()
[ -f "$etc/sources.list" ] && files+=("$etc/sources.list")
for f in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
    [ -f "$f" ] && [ "$(basename "$f")" != "$own" ] && files+=("$f")
done

mirror=""
if ((${#files[@]})); then
    mirror=$(awk '
        function debian_suite(s) {
            return s ~ /^(sid|unstable|testing|stable|oldstable|oldoldstable|experimental|buster|bullseye|bookworm|trixie|forky|duke)(-updates|-backports|-proposed-updates)?$/
        }
        function usable(uri) { return uri !~ /snapshot|security/ }
        function consider(types, uris, suites, enabled,    t, u, s, nt, nu, ns, i, j, k) {
            if (tolower(enabled) == "no") return
            nt = split(types, t, /[ \t]+/)
            for (i = 1; i <= nt; i++) if (t[i] == "deb") break
            if (i > nt) return
            ns = split(suites, s, /[ \t]+/)
            for (k = 1; k <= ns; k++) if (debian_suite(s[k])) break
            if (k > ns) return
            nu = split(uris, u, /[ \t]+/)
            for (j = 1; j <= nu; j++) if (u[j] != "" && usable(u[j])) { print u[j]; found = 1; exit }
        }
        function flush() {
            if (types != "") consider(types, uris, suites, enabled)
            types = uris = suites = enabled = ""
        }
        FNR == 1 { flush(); deb822 = FILENAME ~ /\.sources$/ }
        /^[ \t]*#/ { next }
        !deb822 { sub(/#.*/, "") }
        deb822 && /^[ \t]*$/ { flush(); next }
        deb822 {
            field = tolower($1); sub(/:$/, "", field)
            value = $0; sub(/^[^:]*:[ \t]*/, "", value); sub(/[ \t]+$/, "", value)
            if (field == "types") types = value
            else if (field == "uris") uris = value
            else if (field == "suites") suites = value
            else if (field == "enabled") enabled = value
            next
        }
        {
            line = $0; gsub(/\[[^]]*\]/, "", line)
            n = split(line, w, /[ \t]+/)
            k = 0
            for (i = 1; i <= n; i++) if (w[i] != "") v[++k] = w[i]
            if (k >= 3) consider(v[1], v[2], v[3], "")
        }
        END { if (!found) flush() }
    ' "${files[@]}")
fi

if [ -z "$mirror" ]; then
    cat >&2 <<EOF
ci/debian-mirror.sh: no Debian mirror found in $etc/sources.list or $etc/sources.list.d/.
The test scripts fetch Debian packages (bookworm-backports, a sid root for QEMU 11.1) from
the mirror apt already uses. Add the mirror you use to apt's sources, e.g. a file
$etc/sources.list.d/debian.sources with:
    Types: deb
    URIs: <your Debian mirror, ending in /debian>
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
and run the tests again.
EOF
    exit 1
fi
echo "${mirror%/}"
