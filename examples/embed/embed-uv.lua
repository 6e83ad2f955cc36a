-- SPDX-License-Identifier: MIT
-- embed-uv.lua - the handler that examples/embed/embed-uv.c calls per event.
-- The host calls on_event(engine, n) in a coroutine; the sum below runs on a
-- "cpu" pool thread while the host's loop goes on, and the handler resumes
-- when it is there.
local offpath = require "offpath"

function on_event(engine, n)
  local sum = offpath.run("cpu", function(k)
    local s = 0
    for i = 1, k * 100000 do s = s + i end
    return s
  end, n)
  engine:done(n, sum)
end
