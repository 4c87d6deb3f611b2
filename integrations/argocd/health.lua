-- Argo CD health check for defender.offboard.dev/DeviceOffboard.
-- Install under the argocd-cm key
--   resource.customizations.health.defender.offboard.dev_DeviceOffboard
-- (docs/operations.md, "Argo CD"). Argo CD runs it in gopher-lua (Lua 5.1):
-- no goto, no integer division, and any field of `obj` may be missing.
-- scripts/health-check.py runs it on every status shape the operator writes.
--
--   being deleted                                                     -> Progressing
--   no status, no phase, or a generation the controller has not seen -> Progressing
--   Pending, Submitting, InProgress                                   -> Progressing
--   Succeeded                                                         -> Healthy
--   Failed, reason Cancelled (a person stopped it on purpose)         -> Suspended
--   Failed, any other reason                                          -> Degraded
--   a phase this script does not know                                 -> Unknown

local function condition(status, kind)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == kind then
      return c
    end
  end
  return nil
end

local function text(value)
  if value == nil or value == "" then
    return nil
  end
  return tostring(value)
end

-- Why a final failure happened: the Ready reason names it (DeviceNotFound,
-- Cancelled, ...); lastError.code may be MDE's own code instead.
local function failure_reason(status, ready)
  if ready ~= nil and text(ready.reason) ~= nil then
    return text(ready.reason)
  end
  if type(status.lastError) == "table" and text(status.lastError.code) ~= nil then
    return text(status.lastError.code)
  end
  return "Failed"
end

local function failure_detail(status, ready)
  if type(status.lastError) == "table" and text(status.lastError.message) ~= nil then
    return text(status.lastError.message)
  end
  if ready ~= nil and text(ready.message) ~= nil then
    return text(ready.message)
  end
  return "the offboard failed"
end

local hs = {}
local metadata = obj.metadata
if type(metadata) ~= "table" then
  metadata = {}
end
if text(metadata.deletionTimestamp) ~= nil then
  hs.status = "Progressing"
  hs.message = "Being deleted"
  return hs
end
local status = obj.status
if type(status) ~= "table" or text(status.phase) == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick this resource up"
  return hs
end

local generation = metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to see generation " .. tostring(generation)
    .. " (status is of generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local phase = text(status.phase)
local ready = condition(status, "Ready")

if phase == "Succeeded" then
  hs.status = "Healthy"
  if ready ~= nil and text(ready.message) ~= nil then
    hs.message = "Offboarded: " .. text(ready.message)
  else
    hs.message = "Offboarded (action " .. (text(status.machineActionId) or "?") .. ")"
  end
elseif phase == "Failed" then
  local reason = failure_reason(status, ready)
  if reason == "Cancelled" then
    hs.status = "Suspended"
  else
    hs.status = "Degraded"
  end
  hs.message = reason .. ": " .. failure_detail(status, ready)
elseif phase == "Pending" or phase == "Submitting" or phase == "InProgress" then
  hs.status = "Progressing"
  hs.message = phase
  if ready ~= nil and text(ready.reason) ~= nil and text(ready.reason) ~= phase then
    hs.message = hs.message .. " (" .. text(ready.reason) .. ")"
  end
  if ready ~= nil and text(ready.message) ~= nil then
    hs.message = hs.message .. ": " .. text(ready.message)
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase .. ": this health script is older than the operator"
end
return hs
