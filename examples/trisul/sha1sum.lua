-- sha1sum.lua - Trisul's T.async:schedule example: the SHA-1 of a file is
-- computed in onexecute (on the script's async worker, with io.popen) and
-- printed in onresult (back on the fast path), run by the offpath host.
--
--   offpath run examples/trisul/sha1sum.lua --input paths.txt
--
-- The plugin is Trisul's, unchanged. Only how the path arrives differs:
-- Trisul calls filex_monitor.onfile_http for an extracted file, here
-- on_event passes each input record (a path) to it. Note that onexecute
-- uses the upvalue `path`: offpath copies upvalues into the worker.
require "offpath.trisul"

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
          end
        }
      )

    end,
  },
}

-- How the path arrives: one input record per file.
function on_event(engine, path)
  TrisulPlugin.filex_monitor.onfile_http(engine, nil, nil, path)
end
