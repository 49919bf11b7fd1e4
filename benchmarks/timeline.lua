-- wrk script: one line per response, for latency over time and the version that answered.
--
-- Run wrk with as many threads as connections (-t N -c N), so each thread has one connection
-- and request() / response() alternate: the time between them is that request's latency.
-- Each thread writes "<end> <latency> <status> <version>" lines (seconds on CLOCK_MONOTONIC,
-- the clock of Python's time.monotonic()) to $WRK_TIMELINE_PREFIX-<thread>.log.
-- done() prints wrk's own totals as one JSON line starting with "WRK_SUMMARY ".

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } hotdeploy_timespec;
int clock_gettime(int clk_id, hotdeploy_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("hotdeploy_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

local out = nil
local started = 0
local lines = 0

function init(args)
  out = io.open(os.getenv("WRK_TIMELINE_PREFIX") .. "-" .. thread_number .. ".log", "w")
end

function request()
  started = now()
  return wrk.format()
end

function response(status, headers, body)
  local finished = now()
  local version = "-"
  if body then
    version = string.match(body, '"version":"([^"]+)"') or "-"
  end
  out:write(string.format("%.6f %.6f %d %s\n", finished, finished - started, status, version))
  lines = lines + 1
  if lines % 256 == 0 then
    out:flush()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_SUMMARY {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
