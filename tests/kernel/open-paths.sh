#!/bin/sh
# In a test guest, as root, before anything runs: make each PATH given reachable by every user,
# as the guest tests' unprivileged agent (nobody) needs the venv, the interpreter and the
# repository. A directory on the way that others may not search (root's home is 0700, and
# that is where root's clones and pyenv live) is replaced, in this guest only, by a tmpfs of
# mode 0755 that carries each of its entries back with a bind mount (and whatever is mounted
# below them). Paths, contents and modes below stay as they are; the host is not touched.
#     open-paths.sh PATH...
set -eu
mount --make-rprivate /  # the binds below must not propagate back onto their sources
n=0
for target in "$@"; do
    dir=
    for part in $(echo "$target" | tr '/' ' '); do
        dir=$dir/$part
        [ -d "$dir" ] || break
        # Searchable by others already, or made so by an earlier PATH.
        [ $(($(stat -c '0%a' "$dir") & 1)) = 1 ] && continue
        n=$((n + 1))
        keep=/run/open-paths/$n
        mkdir -p "$keep"
        mount --rbind "$dir" "$keep"
        mount -t tmpfs -o mode=0755 open-paths "$dir"
        find "$keep" -mindepth 1 -maxdepth 1 | while IFS= read -r entry; do
            name=${entry##*/}
            if [ -L "$entry" ]; then
                cp -P "$entry" "$dir/$name"
            elif [ -d "$entry" ]; then
                mkdir "$dir/$name"
                mount --rbind "$entry" "$dir/$name"
            else
                : >"$dir/$name"
                mount --bind "$entry" "$dir/$name"
            fi
        done
    done
done
