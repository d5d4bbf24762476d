from romebert.cli import main

raise SystemExit(main())
