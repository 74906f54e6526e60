#!/usr/bin/env bash
# Checks that the crate's documentation names every public item by one path (docs/DESIGN.md,
# "One path per public item"). Reads the rustdoc output of
# `cargo doc -p layerwise-offload --no-deps` (scripts/test.sh builds it first); the directory
# is the first argument, target/doc/layerwise_offload by default.
#
# - A module page with a "Re-exports" section: rustdoc writes `pub use path::Item;` there
#   instead of documenting the item again when the item is already documented at a public
#   path, so each such line is an item with two paths.
# - all.html lists every documented item once, at its own path: a name listed under two paths
#   is two spellings of one idea (or two items a reader cannot tell apart).
set -euo pipefail
cd "$(dirname "$0")/.."
doc="${1:-target/doc/layerwise_offload}"
if [[ ! -f "$doc/all.html" ]]; then
  echo "check-one-path.sh: no $doc/all.html; run cargo doc -p layerwise-offload --no-deps first" >&2
  exit 2
fi
fail=0
while IFS= read -r page; do
  if grep -q 'id="reexports"' "$page"; then
    echo "check-one-path.sh: ${page#"$doc"/} re-exports items documented at another public path:" >&2
    sed -e 's/^.*id="reexports"//' -e 's/<h2.*$//' "$page" | sed 's/<\/code>/\n/g' |
      grep -o 'pub use .*' | sed -e 's/<[^>]*>//g' -e 's/^/  /' >&2
    fail=1
  fi
done < <(find "$doc" -name index.html | sort)
dups="$(grep -o 'href="[^"#]*\.html"' "$doc/all.html" | sed -e 's/^href="//' -e 's/"$//' |
  grep -v 'index\.html$' | sed -E 's#^(.*/)?[a-z]+\.([A-Za-z0-9_]+)\.html$#\2#' | sort | uniq -d)"
if [[ -n "$dups" ]]; then
  for name in $dups; do
    echo "check-one-path.sh: $name is documented under two paths:" >&2
    grep -o 'href="[^"#]*\.html"' "$doc/all.html" | grep -E "[./]$name\.html\"" | sed 's/^/  /' >&2
  done
  fail=1
fi
if [[ $fail == 0 ]]; then
  echo "check-one-path.sh: $(grep -o 'href="[^"#]*\.html"' "$doc/all.html" | grep -vc 'index\.html') items, one path each"
fi
exit "$fail"
