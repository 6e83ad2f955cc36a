#!/bin/sh
# SPDX-License-Identifier: MIT
# push.sh USER TOKEN MESSAGE - the push-notification sender credit.lua
# launches. A stand-in for the real one (which would post MESSAGE to a push
# gateway for the device TOKEN): it appends "USER TOKEN MESSAGE" to the
# file named by CREDIT_PUSH_LOG (default: standard output), and fails with
# exit status 2 when the user has no device token.
user=$1
token=$2
message=$3
if [ -z "$token" ]; then
  echo "no device token for $user" >&2
  exit 2
fi
if [ -n "${CREDIT_PUSH_LOG:-}" ]; then
  echo "$user $token $message" >>"$CREDIT_PUSH_LOG"
else
  echo "$user $token $message"
fi
