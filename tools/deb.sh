#!/usr/bin/env bash
# Packs a built extension as php<X.Y>-upload-progress_<version>_amd64.deb, laid out like
# Debian's PHP extension packages, for the PHP whose php-config is found (PHP_CONFIG,
# else php-config in PATH). `make deb` runs it on the host (8.2) and in the Debian 13
# root of tools/php-root.sh (8.4).
#
# Usage: tools/deb.sh SO OUTDIR
set -euo pipefail
SO=${1:?usage: tools/deb.sh SO OUTDIR}
OUT=${2:?usage: tools/deb.sh SO OUTDIR}
cd "$(dirname "$0")/.."
REPO=$PWD
PHP_CONFIG=${PHP_CONFIG:-php-config}

VER=$($PHP_CONFIG --version | cut -d. -f1,2)
API=$(basename "$($PHP_CONFIG --extension-dir)")
EXTDIR=$($PHP_CONFIG --extension-dir)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
PKG=php$VER-upload-progress
ARCH=$(dpkg --print-architecture)
STORAGE=/var/lib/upload-progress

# The module must be the one built for this PHP: its API number is in the build ID string.
if ! grep -aq "API$API,NTS" "$SO"; then
  echo "deb: $SO was not built for PHP $VER (API $API, NTS)" >&2; exit 1
fi

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/deb.XXXXXX")
trap 'rm -rf --one-file-system "$STAGE"' EXIT
D=$STAGE/$PKG
mkdir -p "$D/DEBIAN" "$D$EXTDIR" "$D/etc/php/$VER/mods-available" "$D/usr/share/doc/$PKG"

# Debian strips debug info out of packaged objects (dh_strip); the dynamic symbols stay.
objcopy --strip-debug --remove-section=.comment "$SO" "$D$EXTDIR/upload_progress.so"
chmod 0644 "$D$EXTDIR/upload_progress.so"

# mods-available/upload_progress.ini: the extension on, every documented directive
# commented out with its default and the first sentence of its description.
{
  echo "; configuration for php upload_progress module"
  echo "; priority=20"
  echo "extension=upload_progress.so"
  echo
  echo "; Directives: /usr/share/doc/$PKG/configuration.md. All are PHP_INI_SYSTEM."
  echo "; The package made $STORAGE for www-data (mode 0700); give each FPM pool"
  echo "; running as another user its own directory (php_admin_value[upload_progress.storage_dir])."
  echo "upload_progress.storage_dir = $STORAGE"
  python3 - "$REPO/docs/configuration.md" <<'EOF'
import re, sys
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.match(r"^\| `(upload_progress\.[a-z_]+)` \| `([^`]*)` \| (.*) \|$", line.rstrip("\n"))
    if not m or m.group(1) == "upload_progress.storage_dir":
        continue
    name, default, text = m.groups()
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text).replace("`", "").replace("**", "")
    sentences = re.split(r"(?<=\.)\s", text)
    first = sentences[0]
    if len(first) < 20 and len(sentences) > 1:
        first += " " + sentences[1]
    value = default.strip('"')
    print(f"\n; {first}")
    print(f";{name} = {value!s}" if value else f";{name} =")
EOF
} >"$D/etc/php/$VER/mods-available/upload_progress.ini"
echo "/etc/php/$VER/mods-available/upload_progress.ini" >"$D/DEBIAN/conffiles"

cp docs/configuration.md "$D/usr/share/doc/$PKG/configuration.md"
cat >"$D/usr/share/doc/$PKG/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: upload_progress
Source: the upload_progress repository

Files: *
Copyright: the upload_progress authors
License: MIT

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of
 this software and associated documentation files (the "Software"), to deal in
 the Software without restriction, including without limitation the rights to
 use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of
 the Software, and to permit persons to whom the Software is furnished to do so,
 subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all
 copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS
 FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
 COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
 IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
 CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
EOF
# The date is the last commit's (SOURCE_DATE_EPOCH), so the same tree gives the same text.
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then DATE=$(date -R -u -d "@$SOURCE_DATE_EPOCH")
else DATE=$(git log -1 --format=%cD 2>/dev/null || date -R); fi
cat <<EOF | gzip -9n >"$D/usr/share/doc/$PKG/changelog.Debian.gz"
$PKG ($VERSION) unstable; urgency=medium

  * Built from the upload_progress tree for PHP $VER (API $API).
    See the repository's history for the changes.

 -- upload_progress maintainers <upload-progress@localhost>  $DATE
EOF

# Depends: the PHP API, plus the package of every shared library the module links.
deps=("phpapi-$API" "php$VER-common")
for lib in $(objdump -p "$SO" | awk '$1 == "NEEDED" { print $2 }'); do
  path=$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ && !found { print $NF; found = 1 }')
  [ -n "$path" ] || continue
  pkg=$(dpkg -S "$(realpath "$path")" 2>/dev/null | head -n1 | cut -d: -f1) || true
  [ -n "$pkg" ] || pkg=$(dpkg -S "$path" 2>/dev/null | head -n1 | cut -d: -f1) || true
  [ -n "$pkg" ] || continue
  if [ "$pkg" = libc6 ]; then
    glibc=$(objdump -T "$SO" | grep -oE 'GLIBC_[0-9.]+' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    pkg="libc6 (>= $glibc)"
  fi
  case " ${deps[*]} " in *" $pkg "*) ;; *) deps+=("$pkg") ;; esac
done
depends=$(IFS=,; echo "${deps[*]}" | sed 's/,/, /g')

cat >"$D/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: upload_progress maintainers <upload-progress@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$D" | cut -f1)
Depends: $depends
Section: php
Priority: optional
Description: chunked, resumable uploads and upload progress for PHP $VER
 upload_progress gives plain PHP-FPM applications chunked, resumable uploads
 written in place, and real-time upload progress pushed to browsers over
 WebSocket by a small hub process that the extension spawns itself (Pusher
 protocol 7: pusher-js and Laravel Echo work unchanged).
 .
 This package provides the upload_progress module for PHP $VER.
EOF

# Maintainer scripts as dh-php writes them for Debian's extension packages: php_invoke
# (php-common's helper) runs phpenmod / phpdismod per SAPI in maintainer mode, keeps an
# admin's phpdismod across upgrades, forgets the module's state on purge and triggers
# php-fpm's reload. Plain phpenmod / phpdismod when the helper is missing.
cat >"$D/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    # Storage for the default FPM pool's user, made once (an admin's later owner or
    # mode is kept on upgrades), with the app secret already in it: were it created
    # later by a PHP run as root (php -r, a cron job), the pool could not read it.
    if [ ! -d $STORAGE ] && getent passwd www-data >/dev/null; then
        install -d -o www-data -g www-data -m 0700 $STORAGE
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' >$STORAGE/.app-secret)
        chown www-data:www-data $STORAGE/.app-secret
    fi
fi
if [ -e /usr/lib/php/php-maintscript-helper ]; then
    . /usr/lib/php/php-maintscript-helper
    php_invoke enmod $VER ALL upload_progress
elif [ "\$1" = configure ]; then
    phpenmod -v $VER -s ALL upload_progress
fi
exit 0
EOF
cat >"$D/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ -e /usr/lib/php/php-maintscript-helper ]; then
    . /usr/lib/php/php-maintscript-helper
    php_invoke dismod $VER ALL upload_progress
elif [ "\$1" = remove ] && command -v phpdismod >/dev/null; then
    phpdismod -v $VER -s ALL upload_progress
fi
exit 0
EOF
cat >"$D/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = purge ]; then
    # Forget the module's enabled/disabled state for every SAPI (one SAPI per call:
    # phpdismod -p with -s ALL forgets only the last one's).
    if command -v phpquery >/dev/null; then
        for sapi in \$(phpquery -S -v $VER 2>/dev/null); do
            phpdismod -p -f -q -v $VER -s "\$sapi" upload_progress >/dev/null 2>&1 || true
        done
    fi
    # Uploads are data: they stay, and the directory with them.
    rm -f $STORAGE/.app-secret $STORAGE/.sweep $STORAGE/hub-*.log $STORAGE/hub-*.pid
    rmdir --ignore-fail-on-non-empty $STORAGE 2>/dev/null || true
fi
exit 0
EOF
chmod 0755 "$D/DEBIAN/postinst" "$D/DEBIAN/prerm" "$D/DEBIAN/postrm"
(cd "$D" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$D/DEBIAN/md5sums"

mkdir -p "$OUT"
deb=$OUT/${PKG}_${VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zxz --build "$D" "$deb" >/dev/null
echo "deb: $deb ($(du -h "$deb" | cut -f1), Depends: $depends)"
