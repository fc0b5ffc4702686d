#!/usr/bin/env bash
# The Kafka ACLs of one jobmeter deployment: who may write the inputs that
# move money (account records, pricing adjustments), who may write job
# events, and who may read what the meter publishes. docs/security.md
# explains each line.
#
#   deploy/kafka-acls.sh add|remove|print
#
# `add` and `remove` run Kafka's ACL command once per rule; `print` shows the
# commands without running them. The ACL command is $KAFKA_ACLS, default
#   kafka-acls.sh --bootstrap-server "$KAFKA_BOOTSTRAP" --command-config "$KAFKA_ADMIN_CONFIG"
# For the local broker (deploy/local/kafka.sh) use
#   KAFKA_ACLS="deploy/local/kafka.sh acls" deploy/kafka-acls.sh add
#
# Settings (environment), with defaults:
#   PREFIX=jobmeter           the meter's topics.prefix (topics <prefix>.*,
#                             transactional ids <prefix>-*)
#   GROUP=jobmeter            the meter's kafka.group_id (and <group>.*)
#   METER=User:jobmeter       the meter: `jobmeter run`, `rebuild`, `adjust`
#                             from an operator's seat needs SUPPORT instead
#   WORKERS=User:gpu-workers  GPU workers and `jobmeter emit`
#   ACCOUNTS=User:accounts    the account service, the only writer of account records
#   SUPPORT=User:support      support tooling that writes adjustments
#                             directly (`jobmeter adjust`); the API writes
#                             them as METER
#   NOTIFY=User:jobmeter-notify
#                             `jobmeter notify`: reads limit events, writes
#                             <prefix>.limits-dlq, group jobmeter-notify*
#   READERS=User:billing-readers
#                             other consumers of charges, limit events,
#                             statements, dead letters (finance, `jobmeter dump`)
#   READERS_GROUP=billing     consumer groups of READERS (prefixed)
set -euo pipefail

mode="${1:-}"
case "$mode" in
  add | remove | print) ;;
  *) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

prefix="${PREFIX:-jobmeter}"
group="${GROUP:-jobmeter}"
meter="${METER:-User:jobmeter}"
workers="${WORKERS:-User:gpu-workers}"
accounts="${ACCOUNTS:-User:accounts}"
support="${SUPPORT:-User:support}"
notify="${NOTIFY:-User:jobmeter-notify}"
readers="${READERS:-User:billing-readers}"
readers_group="${READERS_GROUP:-billing}"
if [ -n "${KAFKA_ACLS:-}" ]; then
  read -r -a acls <<<"$KAFKA_ACLS"
else
  if [ "$mode" != print ] && [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
    echo "kafka-acls: set KAFKA_BOOTSTRAP (and KAFKA_ADMIN_CONFIG) or KAFKA_ACLS" >&2
    exit 2
  fi
  acls=(kafka-acls.sh --bootstrap-server "${KAFKA_BOOTSTRAP:-<broker:port>}")
  if [ -n "${KAFKA_ADMIN_CONFIG:-}" ]; then acls+=(--command-config "$KAFKA_ADMIN_CONFIG"); fi
fi

t() { echo "--topic $prefix.$1"; }

# One rule: principal, then the ACL command's resource and operation flags.
rule() {
  local principal="$1"; shift
  local args=(--allow-principal "$principal" "$@")
  case "$mode" in
    print) echo "${acls[*]} --add ${args[*]}" ;;
    add) "${acls[@]}" --add "${args[@]}" >/dev/null ;;
    remove) "${acls[@]}" --remove --force "${args[@]}" >/dev/null ;;
  esac
}

# --- inputs that move money: one writer each -------------------------------
# Account records (plan, credits, spend limits, billing cycle).
rule "$accounts" --operation Write $(t accounts)
# Pricing adjustments (overrides, refunds, credits, manual charges).
rule "$support" --operation Write $(t adjustments)
# Job events: the GPU fleet writes them, and reads stop commands.
rule "$workers" --operation Write $(t job-events)
rule "$workers" --operation Read $(t commands)
# `jobmeter emit` reads commands by assignment under this group id, which
# it never joins; the broker still checks that the worker may describe it.
rule "$workers" --operation Describe --group jobmeter-emit

# --- the meter ---------------------------------------------------------------
# Reads its inputs, never writes job events or account records.
rule "$meter" --operation Read $(t job-events) $(t accounts)
# Writes adjustments accepted by its support API, and reads them.
rule "$meter" --operation Read --operation Write $(t adjustments)
# Its outputs, written, and read back by `jobmeter rebuild` to compare.
rule "$meter" --operation Read --operation Write $(t charges) $(t limits) $(t statements) $(t dlq) $(t commands)
# Its internal topics: written and read back (restore, merge, rebuild).
rule "$meter" --operation Read --operation Write \
  $(t changelog) $(t repartition) $(t accounts-by-partition) $(t pro-subscribers)
# Creating missing topics at start (topics.create = true). Drop this rule
# when the topics are created by an administrator.
rule "$meter" --operation Create --resource-pattern-type prefixed --topic "$prefix."
# Its consumer groups: <group>, <group>.adjustments, <group>.accounts.
rule "$meter" --operation Read --resource-pattern-type prefixed --group "$group"
# Its transactions: <prefix>-<instance_id>[-p<n>][-adjustments].
rule "$meter" --operation Write --resource-pattern-type prefixed --transactional-id "$prefix-"

# --- readers of what the meter publishes -------------------------------------
rule "$notify" --operation Read $(t limits)
rule "$notify" --operation Write --operation Create $(t limits-dlq)
rule "$notify" --operation Read --resource-pattern-type prefixed --group jobmeter-notify
rule "$readers" --operation Read $(t charges) $(t limits) $(t statements) $(t dlq)
rule "$readers" --operation Read --resource-pattern-type prefixed --group "$readers_group"
