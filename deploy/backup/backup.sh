#!/usr/bin/env bash
# Back up Tollgate's PostgreSQL database: a compressed custom-format pg_dump, a checksum,
# and a manifest of every table's row count taken in the SAME snapshot as the dump (so
# restore.sh can verify the restored data), then old backups are pruned.
#
#   deploy/backup/backup.sh [DATABASE_URL]
#
# Environment:
#   DATABASE_URL            the database to dump (default: $1)
#   BACKUP_DIR              where backups go (default ./backups)
#   BACKUP_RETENTION_DAYS   delete backups older than this (default 14; 0 keeps all)
#   BACKUP_KEEP_MIN         always keep at least this many newest backups (default 3)
#   BACKUP_COMPRESS_LEVEL   pg_dump compression 0-9 (default 6)
#
# Prints the path of the dump on its last line.
set -euo pipefail

# shellcheck source=deploy/backup/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DB_URL="${1:-${DATABASE_URL:-}}"
if [[ -z "${DB_URL}" ]]; then
    echo "backup: DATABASE_URL (or the first argument) is required" >&2
    exit 2
fi
DB_URL="$(libpq_url "${DB_URL}")"
BACKUP_DIR="${BACKUP_DIR:-./backups}"
RETENTION_DAYS="${BACKUP_RETENTION_DAYS:-14}"
KEEP_MIN="${BACKUP_KEEP_MIN:-3}"
LEVEL="${BACKUP_COMPRESS_LEVEL:-6}"

mkdir -p "${BACKUP_DIR}"
umask 077
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
name="tollgate-${stamp}"
dump="${BACKUP_DIR}/${name}.dump"
manifest="${BACKUP_DIR}/${name}.manifest"
partial="${dump}.partial"
trap 'rm -f "${partial}" "${manifest}.partial"; [[ -n "${snapshot_holder:-}" ]] && kill "${snapshot_holder}" 2>/dev/null || true' EXIT

# One read-only repeatable-read transaction exports its snapshot; pg_dump and the row
# counts both read that snapshot while the transaction stays open.
coproc PSQL { psql "${DB_URL}" -X -q -A -t -v ON_ERROR_STOP=1 2>&1; }
# Copied at once: bash unsets PSQL and PSQL_PID as soon as the coprocess has exited.
snapshot_holder="${PSQL_PID}"
PSQL_IN="${PSQL[1]}"
PSQL_OUT="${PSQL[0]}"
echo "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot();" >&"${PSQL_IN}"
if ! read -r -t 30 snapshot <&"${PSQL_OUT}" || [[ ! "${snapshot}" =~ ^[0-9A-F-]+$ ]]; then
    echo "backup: could not open a snapshot: ${snapshot:-no answer}" >&2
    exit 1
fi

cat >&"${PSQL_IN}" <<'SQL'
SELECT format('%I.%I', n.nspname, c.relname) || E'\t' ||
       (xpath('/row/n/text()',
              query_to_xml(format('SELECT count(*) AS n FROM %I.%I', n.nspname, c.relname),
                           false, true, '')))[1]::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 1;
SELECT '--end--';
SQL
: > "${manifest}.partial"
while read -r -t 300 line <&"${PSQL_OUT}"; do
    [[ "${line}" == "--end--" ]] && break
    if [[ "${line}" != *$'\t'* ]]; then
        echo "backup: row counts failed: ${line}" >&2
        exit 1
    fi
    printf '%s\n' "${line}" >> "${manifest}.partial"
done

pg_dump "${DB_URL}" --format=custom --compress="${LEVEL}" --no-owner --no-privileges \
    --snapshot="${snapshot}" --file="${partial}"

echo "COMMIT;" >&"${PSQL_IN}"
eval "exec ${PSQL_IN}>&-"
wait "${snapshot_holder}" 2>/dev/null || true
snapshot_holder=""

# Only a complete dump gets its final name.
pg_restore --list "${partial}" > /dev/null
mv "${partial}" "${dump}"
mv "${manifest}.partial" "${manifest}"
(cd "${BACKUP_DIR}" && sha256sum "${name}.dump" "${name}.manifest" > "${name}.sha256")

# Retention: older than RETENTION_DAYS, but never the KEEP_MIN newest.
if [[ "${RETENTION_DAYS}" -gt 0 ]]; then
    mapfile -t all < <(ls -1t "${BACKUP_DIR}"/tollgate-*.dump 2>/dev/null || true)
    for old in "${all[@]:${KEEP_MIN}}"; do
        if [[ -n "$(find "${old}" -mtime "+${RETENTION_DAYS}" 2>/dev/null)" ]]; then
            base="${old%.dump}"
            rm -f "${base}.dump" "${base}.manifest" "${base}.sha256"
            echo "backup: pruned ${base}.dump" >&2
        fi
    done
fi

echo "backup: $(wc -l < "${manifest}") tables, $(du -h "${dump}" | cut -f1)" >&2
echo "${dump}"
