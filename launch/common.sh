# Helpers shared by the launch scripts; sourced, not run.
# shellcheck shell=bash

# usage_error MESSAGE: a bad command line; one line on stderr, status 2.
usage_error() {
  echo "${0##*/}: error: $* (see --help)" >&2
  exit 2
}

# fail MESSAGE: anything else that stops the launch; one line on stderr, status 1.
fail() {
  echo "${0##*/}: error: $*" >&2
  exit 1
}

# need_value "$@": the option in $1 must be followed by a value.
need_value() {
  (($# >= 2)) || usage_error "$1 needs a value"
}

# quote ARG...: the arguments as one line of shell. An argument that a shell
# would split or expand is quoted (in double quotes if it holds single quotes and
# nothing special to double quotes, else in single quotes); the rest stay as they
# are, so printed commands read like typed ones and can still be pasted.
# (printf %q is as safe, but backslash-escapes every space of a long --command.)
quote() {
  local arg words=() plain='^[A-Za-z0-9_./:=@%+,-]+$'
  for arg in "$@"; do
    if [[ $arg =~ $plain ]]; then
      words+=("$arg")
    elif [[ $arg == *\'* && $arg != *[\"\$\`\\!]* ]]; then
      words+=("\"$arg\"")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# check_override KEY=VALUE: an --override must name a config field and a value.
check_override() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || usage_error "--override expects KEY=VALUE, got '$1'"
}
