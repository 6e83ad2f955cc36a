-- SPDX-License-Identifier: MIT
-- copy-file.lua - Trisul's "copy a file without blocking the fast path"
-- (T.async:copy), run by the offpath host.
--
--   offpath run examples/trisul/copy-file.lua --input paths.txt
--
-- In Trisul the path comes from a file-extraction callback; here each input
-- record is a path. The copy itself is Trisul's line, unchanged: it returns
-- at once, and the copy runs on the script's async worker. The target is
-- Trisul's /tmp/xyz.txt unless COPY_TO names another file.
require "offpath.trisul"

TrisulPlugin = {
  id = { name = "Copy a file", description = "T.async:copy off the fast path" },
}

local target = os.getenv("COPY_TO") or "/tmp/xyz.txt"

function on_event(engine, path)
  -- save path to /tmp/xyz
  -- T.async run outside fast path, so returns immediately
  T.async:copy(path, target)
end

-- The host calls on_stop once every task has ended.
function on_stop(engine)
  print(("copied to %s, %d items pending"):format(target,
    T.async:pending_items()))
end
