from apostate.cli import main

raise SystemExit(main())
