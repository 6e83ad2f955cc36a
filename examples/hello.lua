-- SPDX-License-Identifier: MIT
-- hello.lua: the smallest script for the offpath command. Each record is
-- counted and answered: a line with a greeting, a JSON record (--format
-- json) with a table, which engine:emit writes back as JSON.
--
--   build/release/offpath run examples/hello.lua --input examples/demo/events.jsonl
local offpath = require "offpath"

function on_event(engine, rec)
  engine:count("records")
  if type(rec) == "table" then
    engine:emit({ id = rec.id, op = rec.op })
  else
    -- A timer suspends only this record's coroutine.
    offpath.sleep(0.001)
    engine:emit("hello " .. rec)
  end
end
