from natgwd.cli import main

raise SystemExit(main())
