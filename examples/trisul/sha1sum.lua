-- SPDX-License-Identifier: MIT
-- sha1sum.lua - Trisul's T.async:schedule example, as its page prints it:
-- the SHA-1 of an extracted file is computed in onexecute (on the plugin's
-- async worker, with io.popen) and printed in onresult (back on the fast
-- path); onresult also counts the file and raises an alert for an empty
-- one with Trisul's engine methods.
--
--   offpath run --compat trisul examples/trisul/sha1sum.lua --input paths.txt
--
-- --compat trisul loads the Trisul layer (T, T.async, the engine methods)
-- and calls TrisulPlugin.filex_monitor.onfile_http for every input record:
-- a line is the path of an extracted file, a JSON object (--format json)
-- may also give timestamp, flowkey, req_header, resp_header and length.
-- Note that onexecute uses the upvalue `path`: offpath copies upvalues into
-- the worker.
TrisulPlugin = {

  id = {
    name = "SHA1 of extracted files",
    description = "T.async:schedule with onexecute and onresult",
  },

  request_async_workers = 2,

  filex_monitor = {

    onfile_http = function(engine, timestamp, flowkey,
                           path, req_header, resp_header, length)

      T.async:schedule(
        {
          -- send the file path
          data = path,

          -- [ on slow path, another thread ]
          -- calc sha1sum on the file
          -- and return the string
          onexecute = function(indata)
            local h = io.popen("sha1sum " .. path)
            local sha1 = h:read("*a")
            h:close()
            return sha1
          end,

          -- [ back on fast path ]
          onresult = function(engine, req, response)
            print("The SHA1 sum of  " .. path .. " IS " .. response)
            -- Trisul's engine methods: a counter, and an alert
            engine:update_counter("{B91A8AD4-C6B6-4FBC-E862-FF94BC204A35}",
              "extracted files", 0, 1)
            if response:find("^da39a3ee5e6b4b0d3255bfef95601890afd80709") then
              engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}",
                flowkey, "EMPTY-FILE", 2, "empty file " .. path)
            end
          end
        }
      )

    end,
  },
}
