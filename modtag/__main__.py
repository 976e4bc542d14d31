from modtag.cli import main

raise SystemExit(main())
