#!/usr/bin/env bash
# What backup.sh and restore.sh share; sourced by both, not run.

# The application's DATABASE_URL may carry Django's own settings as query parameters
# (`?conn_max_age=60`, README), which libpq refuses ("invalid URI query parameter"): they
# are dropped, libpq's own (sslmode...) kept.
libpq_url() {
    local url="$1" param name kept=""
    local -a params=()
    [[ "${url}" == *\?* ]] || { printf '%s' "${url}"; return; }
    IFS='&' read -r -a params <<< "${url#*\?}"
    for param in "${params[@]}"; do
        name="${param%%=*}"
        case "${name,,}" in
            conn_max_age|conn_health_checks|atomic_requests|autocommit|disable_server_side_cursors) ;;
            *) kept="${kept:+${kept}&}${param}" ;;
        esac
    done
    printf '%s' "${url%%\?*}${kept:+?${kept}}"
}
