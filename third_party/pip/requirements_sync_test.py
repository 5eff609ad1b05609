"""PIP_PACKAGES in requirements.bzl must match requirements.txt and requirements-test.txt."""
import re
import sys


def main():
    declared = set(sys.argv[1:])
    pinned = set()
    for name in ("requirements.txt", "requirements-test.txt"):  # runfiles-relative
        with open(name, encoding="utf-8") as f:
            pinned |= {
                re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("-", "_").replace(".", "_")
                for line in f
                if line.strip() and not line.lstrip().startswith(("#", "-r "))
            }
    if declared != pinned:
        print("requirements*.txt only:", sorted(pinned - declared))
        print("requirements.bzl only:", sorted(declared - pinned))
        print("Update PIP_PACKAGES in third_party/pip/requirements.bzl.")
        return 1
    print("%d pip packages in sync" % len(declared))  # noqa: UP031
    return 0


if __name__ == "__main__":
    sys.exit(main())
