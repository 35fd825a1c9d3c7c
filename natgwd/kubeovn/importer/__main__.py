from natgwd.kubeovn.importer.cli import main

raise SystemExit(main())
