#!/bin/sh
# In a test guest, as root: mount the host root's second, cached 9p export
# (tests/kernel/vm.py) and put it over /usr (as an overlay, so /usr stays
# writable) and over each TREE given (read-only binds).
#     cached-root.sh TAG TREE...
set -eu
tag=$1
shift
mkdir -p /run/cached-root /run/cached-usr/upper /run/cached-usr/work
mount -t 9p -o ro,trans=virtio,version=9p2000.L,access=any,msize=512000,cache=loose "$tag" /run/cached-root
mount -t overlay -o lowerdir=/run/cached-root/usr,upperdir=/run/cached-usr/upper,workdir=/run/cached-usr/work \
    overlay /usr
for tree in "$@"; do
    case $tree in
        /usr | /usr/*) ;;  # already under the overlay
        *) mount --bind "/run/cached-root$tree" "$tree" ;;
    esac
done
