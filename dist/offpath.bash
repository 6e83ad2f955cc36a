# bash completion for offpath(1). Installed as
# share/bash-completion/completions/offpath.

_offpath() {
  local cur prev words cword
  if declare -F _init_completion >/dev/null 2>&1; then
    _init_completion -n = || return
  else
    COMPREPLY=()
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD - 1]}
    cword=$COMP_CWORD
  fi
  local opts="--input -i --format --output -o --pool --compat --tick
    --max-inflight --grace --stats --json --quiet -q --fail-on-error
    --metrics --help -h"

  if [ "$cword" -eq 1 ]; then
    COMPREPLY=($(compgen -W "run --help --version" -- "$cur"))
    return
  fi
  case $prev in
  --format)
    COMPREPLY=($(compgen -W "lines json" -- "$cur"))
    return
    ;;
  --compat)
    COMPREPLY=($(compgen -W "trisul momentum" -- "$cur"))
    return
    ;;
  --input | -i)
    COMPREPLY=($(compgen -f -- "$cur") $(compgen -W "- tcp://127.0.0.1: udp://127.0.0.1:
      redis-stream://127.0.0.1:6379/" -- "$cur"))
    return
    ;;
  --output | -o)
    COMPREPLY=($(compgen -f -- "$cur") $(compgen -W "redis-stream://127.0.0.1:6379/" -- "$cur"))
    return
    ;;
  --pool)
    COMPREPLY=($(compgen -W "io= cpu=" -- "$cur"))
    compopt -o nospace 2>/dev/null
    return
    ;;
  --metrics)
    COMPREPLY=($(compgen -W "127.0.0.1:" -- "$cur"))
    compopt -o nospace 2>/dev/null
    return
    ;;
  --tick | --max-inflight | --grace)
    return
    ;;
  esac
  case $cur in
  -*)
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    ;;
  *)
    # The script: Lua files and directories.
    COMPREPLY=($(compgen -f -X '!*.lua' -- "$cur") $(compgen -d -- "$cur"))
    ;;
  esac
}
complete -F _offpath offpath
