#!/usr/bin/env bash
# Restore a backup made by backup.sh, then verify it: every table's row count in the
# restored database must equal the manifest taken in the dump's own snapshot.
#
#   deploy/backup/restore.sh [--yes] [--create] DUMP [TARGET_DATABASE_URL]
#
#   --yes      do not ask for confirmation (required when stdin is not a terminal)
#   --create   create the target database when it does not exist
# TARGET_DATABASE_URL defaults to $DATABASE_URL. The target's existing objects are
# replaced (pg_restore --clean --if-exists) in one transaction: on any error nothing changes.
# Exit status: 0 restored and verified, 1 failed, 2 usage, 3 not confirmed, 4 verification failed.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# shellcheck source=deploy/backup/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

assume_yes=0
create=0
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --yes|-y) assume_yes=1 ;;
        --create) create=1 ;;
        -h|--help) usage ;;
        -*) echo "restore: unknown option $1" >&2; usage ;;
        *) args+=("$1") ;;
    esac
    shift
done
[[ ${#args[@]} -ge 1 && ${#args[@]} -le 2 ]] || usage
dump="${args[0]}"
target="${args[1]:-${DATABASE_URL:-}}"
[[ -n "${target}" ]] || { echo "restore: no target database (argument or DATABASE_URL)" >&2; exit 2; }
target="$(libpq_url "${target}")"
[[ -r "${dump}" ]] || { echo "restore: cannot read ${dump}" >&2; exit 1; }

base="${dump%.dump}"
manifest="${base}.manifest"
checksum="${base}.sha256"
[[ -r "${manifest}" ]] || { echo "restore: missing manifest ${manifest}" >&2; exit 1; }

# 1. The files are the ones backup.sh wrote, and the archive is readable.
if [[ -r "${checksum}" ]]; then
    (cd "$(dirname "${dump}")" && sha256sum --check --quiet "$(basename "${checksum}")") \
        || { echo "restore: checksum mismatch" >&2; exit 1; }
else
    echo "restore: no checksum file ${checksum}" >&2
    exit 1
fi
pg_restore --list "${dump}" > /dev/null

# The database name and a maintenance URL (same server, database `postgres`).
without_query="${target%%\?*}"
query=""
[[ "${target}" == *\?* ]] && query="?${target#*\?}"
dbname="${without_query##*/}"
server="${without_query%/*}"
maintenance="${server}/postgres${query}"
display="$(printf '%s' "${server}" | sed -E 's#//([^:@/]+):[^@/]*@#//\1:***@#')/${dbname}"

exists="$(psql "${maintenance}" -X -A -t -v ON_ERROR_STOP=1 \
    -c "SELECT 1 FROM pg_database WHERE datname = '${dbname//\'/\'\'}'")"
if [[ -z "${exists}" ]]; then
    if [[ "${create}" -ne 1 ]]; then
        echo "restore: database ${dbname} does not exist (use --create)" >&2
        exit 1
    fi
fi

# 2. Confirmation: restoring replaces what is there.
echo "restore: ${dump} -> ${display}$([[ -z "${exists}" ]] && echo ' (new database)')" >&2
if [[ "${assume_yes}" -ne 1 ]]; then
    if [[ ! -t 0 ]]; then
        echo "restore: not confirmed (no terminal); pass --yes to restore non-interactively" >&2
        exit 3
    fi
    read -r -p "Type the database name (${dbname}) to replace its contents: " answer
    if [[ "${answer}" != "${dbname}" ]]; then
        echo "restore: not confirmed" >&2
        exit 3
    fi
fi

if [[ -z "${exists}" ]]; then
    psql "${maintenance}" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"${dbname//\"/\"\"}\""
fi

# 3. Restore in one transaction.
pg_restore --dbname="${target}" --no-owner --no-privileges --clean --if-exists \
    --single-transaction --exit-on-error "${dump}"

# 4. Verify: the restored row counts equal the manifest.
actual="$(mktemp)"
trap 'rm -f "${actual}"' EXIT
psql "${target}" -X -A -t -v ON_ERROR_STOP=1 > "${actual}" <<'SQL'
SELECT format('%I.%I', n.nspname, c.relname) || E'\t' ||
       (xpath('/row/n/text()',
              query_to_xml(format('SELECT count(*) AS n FROM %I.%I', n.nspname, c.relname),
                           false, true, '')))[1]::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 1;
SQL
if ! diff -u "${manifest}" "${actual}" >&2; then
    echo "restore: VERIFICATION FAILED: row counts differ from the backup's manifest" >&2
    exit 4
fi
echo "restore: verified $(wc -l < "${manifest}") tables against the manifest" >&2
