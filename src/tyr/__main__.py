from tyr.cli import main

raise SystemExit(main())
