"""The `ccm` command's sub-commands beyond serving: audit, keys, config check, and the calls to a
running server (status, dispatch). `ccm.cli` assembles them into one command."""
